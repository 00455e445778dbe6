"""Live calls: the Twilio stream protocol, provider adapters and the bridge."""
