"""tmlp's CLI with rank 1 dying (os._exit) at a chosen point: TMLP_DIE_IN = "calibration" or "training"."""
import os
import sys

import tmlp.calibration.calibrate as calibrate
import tmlp.train as train


def dies(original, name):
    def wrapper(*args, **kwargs):
        if os.environ.get("RANK") == "1" and os.environ.get("TMLP_DIE_IN") == name:
            os._exit(3)
        return original(*args, **kwargs)
    return wrapper


calibrate.centres_and_tensors = dies(calibrate.centres_and_tensors, "calibration")
train.end_epoch = dies(train.end_epoch, "training")
from tmlp.cli import main  # noqa: E402

sys.exit(main())
