"""What runs in or configures a jail: the nsjail binary, argv building, languages, the kernel."""
