"""Shared foundation of loraswap: the base model (embedded ``tiny-sd`` and loaders), its identity
(fingerprint, architecture descriptor), the settings object and the domain error hierarchy."""
