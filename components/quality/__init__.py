"""Quality: checks on the data before and beside training. Imports `core` and `ingestion`.

Great Expectations suites and the quarantine report of validate, near-duplicate search (perceptual
hashes, sub-quadratic Hamming search), and suspect labels from out-of-fold heads (`label_issues`).
"""
