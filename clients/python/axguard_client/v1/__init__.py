"""Generated gRPC stubs of the axguard.v1 contract (`make proto`; do not edit)."""
