"""Sample data shared by the demo, the bench, the studies and the tests, no downloads: real photos
(``photos``), paraphrase groups (``paraphrases``), generated and corrupt images (``generated``),
images no photo stream holds (``ood``) and per-modality traffic built from them (``traffic``).

Nothing is imported here: the image modules load PIL and numpy, which a text-only caller need not.
"""
