"""What the DVC stages share: atomic outputs, manifests and metrics (stage), checkpoint sources
(download), eval sets, and the transformers reference answers."""
