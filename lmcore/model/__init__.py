"""The model layer: the Llama-style decoder (:mod:`lmcore.model.decoder`), the textbook
reference it is tested against, and model folders on disk (:mod:`lmcore.model.folder`). No
training, data or parallelism code: Accelerate wraps the model."""
