"""One router per resource; coordinator/api/app.py includes them all."""
