"""genfast.nn"""
