"""Image conditioning: preprocessing (`preprocess`), DINOv3 + NAF features (`image_encoder`, `naf`) and their
back-projection onto voxels (`proj_grid`). Import the submodules directly; `image_encoder` pulls in
transformers, the others do not."""
