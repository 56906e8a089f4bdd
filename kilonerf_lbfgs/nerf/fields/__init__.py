"""Radiance fields: the KiloNeRF grid of tiny networks (``kilonerf``) and the teachers of the
distillation route (``teacher``, ``hash_encoding``)."""
