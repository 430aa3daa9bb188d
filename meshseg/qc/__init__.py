"""Review after inference: QC flags (`checks`), registration to MNI and lesion location
(`location`, with the arterial atlas in atlas/), the QC picture (`picture`) and the cohort's
HTML report (`html_report`)."""
