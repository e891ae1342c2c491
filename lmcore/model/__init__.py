"""The model layer: the Llama-style decoder (:mod:`lmcore.model.decoder`), the textbook
reference it is tested against, model folders on disk (:mod:`lmcore.model.folder`), and which of
the decoder's interchangeable kernels is fastest on this machine (:mod:`lmcore.model.kernels`). No
training, data or parallelism code: Accelerate wraps the model."""
