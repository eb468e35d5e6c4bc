"""The contract between the trainer and the selector: configs and messages (pydantic v2 only)."""
