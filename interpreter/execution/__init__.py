"""Running programs: host preparation, the nsjail runner, admission control."""
