"""Generated gRPC code for the lorafleet.v1 APIs (``make proto`` regenerates it from proto/)."""
