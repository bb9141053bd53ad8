"""gridvm.store"""
