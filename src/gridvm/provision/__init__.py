"""Provisioning: Debian images from recipes, imports of existing systems, identity resets,
templates and clones, and the pygrub reader. Uses config/, images/ and host/ helpers (the
process runner); nothing below it imports it."""
