"""Speech tokens: audio I/O, frame features, k-means phonetic units and acoustic codecs."""
