"""Pretraining the embedded ``tiny-sd`` model from scratch on procedurally drawn, captioned shapes.

``data`` draws the dataset, ``model`` builds the (small, SD1.5-named) architecture, ``train`` trains
VAE then UNet + text encoder, ``checker`` measures how well generated images follow their prompts.
"""
