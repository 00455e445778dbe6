"""Protocol peers that play Twilio, Vapi and Retell against Callgate in tests."""
