"""Demo data generator and demo config."""
