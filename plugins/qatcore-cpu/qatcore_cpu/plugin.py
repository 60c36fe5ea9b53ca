"""Entry point of the qatcore-cpu plugin."""
