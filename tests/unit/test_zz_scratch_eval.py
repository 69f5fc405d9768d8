def test_x():
    import sys
    from tests.conftest import write_image
    print([p for p in sys.path][:5])
