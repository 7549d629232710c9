"""OPC-UA test fixtures (simulated PLC)."""
