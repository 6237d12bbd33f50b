"""Data stages: synthetic datasets in the real COCO/Flickr30k layouts, download, Arrow conversion, readers."""
