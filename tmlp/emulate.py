"""An emulated aarch64 board on an x86-64 host: qemu-user runs an arm64 Python with onnxruntime and numpy.

Built once into ``$TMLP_CACHE/arm64-python`` (about 200 MB, 15-60 s, from the Debian and PyPI registries), in a
temporary folder renamed when complete:

- ``qemu-aarch64``: the static qemu-user binary out of Debian bookworm's ``qemu-user-static`` package;
- ``rootfs/``: arm64 ``python3.11-minimal``, its standard library and C/C++ runtimes, unpacked from Debian packages
  fetched with a private apt configuration (the host's apt state is never touched), plus an ARM ``/proc/cpuinfo``
  (qemu 7.2 passes the host's through, which crashes onnxruntime's CPU detection);
- ``site/``: PyPI's aarch64 wheels of onnxruntime and numpy, unzipped.

Timings under emulation are not device timings (a model runs ~80x slower than on the host).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable

from tmlp.errors import TmlpError
from tmlp.io import cache_path

DEBIAN_MIRROR = os.environ.get("TMLP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SUITE = "bookworm"
PYTHON_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
WHEELS = ["onnxruntime", "numpy"]
AARCH64_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                     "manylinux2014_aarch64"]
# What the emulated cores report in /proc/cpuinfo (implementer 0x41 = Arm): "CPU part" and features per qemu CPU.
ARM_CPUS = {
    "cortex-a57": ("0xd07", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),  # the Pi 4's BCM2711 has no crypto extensions
    "cortex-a76": ("0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
                            "dcpop asimddp"),
}
CPUINFO_ENTRY = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: {features}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: {part}
CPU revision\t: 0

"""


@dataclass(frozen=True)
class ArmPython:
    """A built emulated Python: run ``command(script, *args)`` with ``env(cpu)``."""

    root: str

    @property
    def qemu(self) -> str:
        return os.path.join(self.root, "qemu-aarch64")

    @property
    def rootfs(self) -> str:
        return os.path.join(self.root, "rootfs")

    @property
    def site(self) -> str:
        return os.path.join(self.root, "site")

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-L", self.rootfs, os.path.join(self.rootfs, "usr", "bin", "python3.11"), *args]

    def env(self, cpu: str) -> dict[str, str]:
        return {"QEMU_CPU": cpu, "PYTHONPATH": self.site, "PYTHONNOUSERSITE": "1", "PATH": "/usr/bin:/bin",
                "HOME": tempfile.gettempdir(), "LANG": "C.UTF-8"}


def default_root() -> str:
    return cache_path("arm64-python")


def ensure_arm_python(root: str | None = None, log: Callable[[str], None] = print) -> ArmPython:
    """The emulated arm64 Python under ``root`` (default ``$TMLP_CACHE/arm64-python``), built if missing."""
    root = root or default_root()
    env = ArmPython(root)
    if os.path.isfile(os.path.join(root, "READY")):
        return env
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise TmlpError(f"building the emulated Raspberry Pi needs {tool} (a Debian/Ubuntu host); run "
                            "`tmlp devices check` on one")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".arm64-python-", dir=os.path.dirname(root))
    try:
        log(f"building the emulated arm64 Python once (Debian {DEBIAN_SUITE} qemu-user-static + python3.11, "
            f"PyPI aarch64 wheels of {' and '.join(WHEELS)}) in {root}")
        debs = _apt_download(work, log)
        _unpack(debs, work)
        write_cpuinfo(os.path.join(work, "rootfs"))
        _install_wheels(os.path.join(work, "site"), work, log)
        with open(os.path.join(work, "READY"), "w") as f:
            f.write("ok\n")
        if os.path.isdir(root):
            shutil.rmtree(root)
        os.rename(work, root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return env


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TmlpError(f"{what} failed: {tail[-1] if tail else 'exit ' + str(proc.returncode)}")
    return proc


def _apt_options(work: str, arch: str) -> list[str]:
    """apt-get options for a private configuration under ``work`` whose native architecture is ``arch``."""
    apt = os.path.join(work, f"apt-{arch}")
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/preferences.d", "etc/apt.conf.d",
                "etc/sources.list.d"):
        os.makedirs(os.path.join(apt, sub), exist_ok=True)
    open(os.path.join(apt, "state", "status"), "w").close()  # an empty dpkg status: every dependency is listed
    with open(os.path.join(apt, "etc", "sources.list"), "w") as f:
        f.write(f"deb [arch={arch}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    opts = ["-o", f"Dir::Etc={apt}/etc", "-o", f"Dir::Etc::SourceList={apt}/etc/sources.list",
            "-o", f"Dir::Etc::SourceParts={apt}/etc/sources.list.d", "-o", f"Dir::State={apt}/state",
            "-o", f"Dir::State::status={apt}/state/status", "-o", f"Dir::Cache={apt}/cache",
            "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures::={arch}", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root"]
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    if os.path.isfile(keyring):
        opts += ["-o", f"Dir::Etc::Trusted={keyring}"]
    return opts


def _apt_download(work: str, log: Callable[[str], None]) -> list[str]:
    """Fetch the arm64 Python packages and qemu-user-static (amd64) with private apt configurations."""
    debs_dir = os.path.join(work, "debs")
    os.makedirs(debs_dir)
    log("  apt-get update (private configurations, arm64 and amd64)")
    arm, amd = _apt_options(work, "arm64"), _apt_options(work, "amd64")
    _run(["apt-get", *arm, "update"], "apt-get update for the arm64 packages")
    _run(["apt-get", *amd, "update"], "apt-get update for qemu-user-static")
    sim = _run(["apt-get", *arm, "-s", "install", "--no-install-recommends", *PYTHON_PACKAGES],
               "resolving the arm64 Python packages")
    names = [line.split()[1] for line in sim.stdout.splitlines() if line.startswith("Inst ")]
    log(f"  apt-get download {len(names)} arm64 packages and qemu-user-static")
    _run(["apt-get", *arm, "download", *names], "downloading the arm64 Python packages", cwd=debs_dir)
    _run(["apt-get", *amd, "download", "qemu-user-static"], "downloading qemu-user-static", cwd=debs_dir)
    return sorted(glob.glob(os.path.join(debs_dir, "*.deb")))


def _unpack(debs: list[str], work: str) -> None:
    rootfs = os.path.join(work, "rootfs")
    os.makedirs(rootfs)
    for deb in debs:
        if os.path.basename(deb).startswith("qemu-user-static_"):
            tmp = os.path.join(work, "qemu-pkg")
            _run(["dpkg-deb", "-x", deb, tmp], f"unpacking {os.path.basename(deb)}")
            shutil.copy(os.path.join(tmp, "usr", "bin", "qemu-aarch64-static"), os.path.join(work, "qemu-aarch64"))
            os.chmod(os.path.join(work, "qemu-aarch64"), 0o755)
            shutil.rmtree(tmp)
        else:
            _run(["dpkg-deb", "-x", deb, rootfs], f"unpacking {os.path.basename(deb)}")
    if not os.path.isfile(os.path.join(work, "qemu-aarch64")):
        raise TmlpError("qemu-user-static was not downloaded; check the Debian mirror (TMLP_DEBIAN_MIRROR)")
    shutil.rmtree(os.path.join(work, "debs"))


def write_cpuinfo(rootfs: str, cpu: str = "cortex-a72", cores: int = 4) -> None:
    """The ARM /proc/cpuinfo the emulated programs read (qemu -L looks it up under ``rootfs`` first)."""
    if cpu not in ARM_CPUS:
        raise TmlpError(f"no /proc/cpuinfo template for qemu CPU {cpu!r}; known: {', '.join(ARM_CPUS)}")
    part, features = ARM_CPUS[cpu]
    os.makedirs(os.path.join(rootfs, "proc"), exist_ok=True)
    tmp = os.path.join(rootfs, "proc", f".cpuinfo.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("".join(CPUINFO_ENTRY.format(i=i, part=part, features=features) for i in range(cores)))
    os.replace(tmp, os.path.join(rootfs, "proc", "cpuinfo"))


def _install_wheels(site: str, work: str, log: Callable[[str], None]) -> None:
    wheels = os.path.join(work, "wheels")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", wheels, *WHEELS]
    for platform in AARCH64_PLATFORMS:
        cmd[5:5] = ["--platform", platform]
    log(f"  pip download aarch64 wheels: {' '.join(WHEELS)}")
    _run(cmd, "downloading the aarch64 wheels")
    os.makedirs(site)
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    shutil.rmtree(wheels)
