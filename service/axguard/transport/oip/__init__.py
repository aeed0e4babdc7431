"""Generated stubs of the vendored Open Inference Protocol (proto/inference); `make proto`
rewrites them. The servicer is axguard.openinference."""
