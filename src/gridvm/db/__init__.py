"""The replicated database service (members, promotion, rejoin): uses cluster/ and lb/."""
