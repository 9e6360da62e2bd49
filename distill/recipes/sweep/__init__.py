"""`distill sweep`: the study's grid (grid), its fine-tuned calls (finetune), statistics over seeds (stats), and merging
kept stages (merge)."""
