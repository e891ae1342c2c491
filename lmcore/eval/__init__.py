"""The evaluation layer: the evaluate stage (bits per byte, perplexity, task metrics, samples) and
the comparison of pipeline runs in MLflow.

The stage, one job per module: :mod:`~lmcore.eval.windows` (the strided sliding window),
:mod:`~lmcore.eval.unigram` (the baseline), :mod:`~lmcore.eval.scored` (which documents are scored,
their bytes, text tokenized by the encode stage's rules), :mod:`~lmcore.eval.tasks` (fine-tuned task
metrics, the GLUE submission), :mod:`~lmcore.eval.report` (report, samples, what was evaluated) and
:mod:`~lmcore.eval.evaluate` (reading text files, :func:`~lmcore.eval.evaluate.evaluate_texts`, the
stage itself)."""
