"""The API: answers to every request on ``hostdev.api``, and offering validation."""
