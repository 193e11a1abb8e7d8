"""hometeam's event contracts: envelope, payload models per topic family, topic registry."""
