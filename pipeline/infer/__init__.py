"""The inference CLI, `python -m pipeline.infer` (docs/inference_guide.md): `cli` parses the arguments
and generates over runs, `runs` finds each run's base model and adapter (registry or Hub), `images`
reads files, folders and URLs, `output` prints, persists and logs the results."""
