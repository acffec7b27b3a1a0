"""Fitting the time-series encoders (LSTM, autoencoder) on normal data; ``embedstream train``.

Importing this package is cheap. What training writes (safetensors + JSON sidecar) is defined in
``embedstream.encoders`` (``Sidecar``), which the encoders read without importing this package.
"""
