"""ViLT stages: pretraining (MLM + ITM), retrieval fine-tuning and retrieval evaluation."""
