"""MQTT test fixtures (mosquitto on a free loopback port)."""
