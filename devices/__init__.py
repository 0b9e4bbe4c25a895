"""Target device profiles (one TOML per board)."""
