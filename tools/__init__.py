"""Developer tools around hometeam (a simulator and a live terminal view). Not part of the
services: nothing under ``services/`` imports from here."""
