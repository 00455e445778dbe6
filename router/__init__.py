"""The front door: settings, the web application, Twilio webhooks, composition."""
