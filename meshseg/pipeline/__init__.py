"""predict's job, one step a module: validate -> conform -> infer -> un-conform, driven by
`predict` for one file and `cohort` for many, each input's outcome kept by `record`."""
