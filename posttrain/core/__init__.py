"""The ground floor: error classes, the strict config base, the stage context and signal handling.
Everything imports these; they import nothing of posttrain above them."""
