"""genfast.integrations"""
