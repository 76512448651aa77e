"""The platform's public contracts, typed: event types and data, the dataset spec, the model card, rejection reasons.

Imports only the foundation modules (settings, auth, timestamps). The predict function imports
events.py; the pydantic models (spec, card, event_data) load only where training, the steps or
the CLI use them."""
