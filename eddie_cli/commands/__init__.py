"""One module per workflow; each adds its commands to the `eddie` group."""
