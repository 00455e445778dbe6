"""Protocol peers that play Twilio and Vapi against Callgate in integration tests."""
