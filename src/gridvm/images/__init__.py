"""gridvm.images"""
