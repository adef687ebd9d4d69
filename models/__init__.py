"""Model families, one module or package each (its model, Task, data, metrics and tools);
importing a family registers its Task. images.py: the image data the vision families share
(the procedural shapes generator, ImageFolder)."""
