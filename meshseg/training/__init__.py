"""Training: settings (`config`), training pairs (`data`), synthetic data (`synth`),
`train`, distillation from a teacher (`distill`) and the hyper-parameter search (`tune`)."""
