"""The evaluation layer: the evaluate stage (bits per byte, perplexity, task metrics, samples) and
the comparison of pipeline runs in MLflow."""
