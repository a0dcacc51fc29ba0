"""What is checked before a model is built or a checkpoint resumed: preflight (does it fit, can it run here),
resume_checks (the checkpoint against this command line), guard (the task mixin that runs them)."""
