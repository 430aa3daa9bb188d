"""The ARC benchmark: `meshseg eval` (`evaluate`), nested cross-validation (`splits`, `cv`,
`cv_units`), statistics (`stats`) and figures (`figures`)."""
