"""Fitting the time-series encoders (LSTM, autoencoder) on normal data; ``embedstream train``.

Importing this package is cheap: the encoders read sidecars through ``artifacts`` at export time.
"""
