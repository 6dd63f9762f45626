"""What this machine runs, and how fast: sftplug doctor, bench attention, bench step."""
